"""Jobs: the state machine (state.py); the Celery tasks live in worker/."""
