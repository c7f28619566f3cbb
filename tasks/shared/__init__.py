"""What several steps share: the trained-model result type, the training preflight, process pools."""
