"""LLM answering: sensitivity routing, the cloud Triton client, failover to a local model."""
