"""One job, step by step: where jobs enter, the runner and its steps, events, result, outputs and report, the callback."""
