"""KV memory that follows what KVzap keeps: scheduler-side block accounting (`manager.py`,
`spec.py`) and the worker-side page state, which imports no vLLM: the page pool (`page_pool.py`),
the per-request and per-row bookkeeping (`row_state.py`), the step's inputs and outputs
(`step_plan.py`) and the page table that plans each step over them (`page_table.py`)."""
