"""A run: its definition and hash (`config`), and its record in the store (`record`)."""
