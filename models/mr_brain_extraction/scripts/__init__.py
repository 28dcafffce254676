"""Custom code of the mr_brain_extraction bundle, imported through its config (`scripts.cascade...`)."""
