"""Scan jobs on Ray: specs → prompts → shards → actors → committed store."""
