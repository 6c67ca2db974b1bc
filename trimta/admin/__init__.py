"""Operating a running daemon: the queue command line and its control socket."""
