"""Task plugins: one module per task, each defining TASK (see engine/task.py for the contract)."""
