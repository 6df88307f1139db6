"""KV memory that follows what KVzap keeps: scheduler-side block accounting (`manager.py`,
`spec.py`) and the worker-side pool of per-(layer, KV head) pages (`pages.py`)."""
