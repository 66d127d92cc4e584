"""Helpers for pdeds's own tests (shipped so downstream users can test extensions too)."""
