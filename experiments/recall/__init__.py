"""The recall-model experiment: the task, the model trained on it, its surrogates."""
