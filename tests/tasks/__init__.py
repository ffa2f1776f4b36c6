"""Tests of the training tasks."""
