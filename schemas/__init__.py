"""What a job, a store and a result are: pydantic models only, no torch."""
