"""The private knowledge base: load, chunk, classify, embed, store, retrieve, answer."""
