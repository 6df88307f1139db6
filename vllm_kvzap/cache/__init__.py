"""KV memory that follows what KVzap keeps: scheduler-side block accounting (`manager.py`,
`spec.py`) and the worker-side page state (`page_table.py`, which imports no vLLM)."""
