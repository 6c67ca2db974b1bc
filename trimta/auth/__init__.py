"""SMTP AUTH credentials: the credentials file, password hashes, throttling."""
