"""jobs: entry points. The only layer that parses arguments, configures logging, calls ray.init and talks to MLflow."""
