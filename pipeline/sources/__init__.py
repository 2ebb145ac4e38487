"""Adapters that turn each source format into candidate sample rows (see `common.Candidate`)."""
