"""Data: the interchange schema (verl's parquet layout), converters for public datasets, synthetic tasks."""
