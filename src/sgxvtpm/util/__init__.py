"""Small shared helpers: durable files, structured logs."""
