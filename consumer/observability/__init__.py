"""What operators read: JSON logs with job context, Prometheus metrics."""
