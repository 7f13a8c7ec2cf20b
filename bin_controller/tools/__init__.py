"""Developer and operator tools kept out of the service's imports: bench, monitor, check."""
