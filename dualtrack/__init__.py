"""dualtrack: the operator CLI (local stack, knowledge base, later on-prem apply and plans)."""
