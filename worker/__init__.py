"""The job worker: a trusted Celery supervisor (``worker.tasks``) that runs each
compression in a sandboxed child process (``worker.sandbox`` + ``worker.child``)."""
