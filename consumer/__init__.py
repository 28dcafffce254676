"""The ML analysis service: Kafka and HTTP in, a segmentation model, results to object storage."""
