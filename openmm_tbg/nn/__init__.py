"""Neural networks used by the flow."""
