"""One job, step by step: the runner, its events and result, output keys and encoders, the report, the backend callback."""
