"""The RAG gateway: FastAPI app in front of the knowledge base."""
