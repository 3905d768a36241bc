"""Knowledge sync over Kafka: the event schema, the publisher in the ingestion path,
and the consumer that applies events (and Debezium changes) to a knowledge base."""
