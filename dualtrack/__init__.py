"""dualtrack: the operator CLI (local stack, knowledge base, model repository, on-prem, sync,
plans, benchmarks)."""
