"""What every path shares to turn a request into tensors: chat templates, prompt rendering, images,
token helpers, and the training/scoring data readers (see docs/architecture.md)."""
