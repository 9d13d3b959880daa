"""One router module per resource; routes stay thin and call plain functions."""
