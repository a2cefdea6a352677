"""TensorTrim service: REST API, persistence and job bookkeeping around the engine."""
