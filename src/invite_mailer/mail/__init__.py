"""A mail request in, a rendered mail and its wire bytes out; the only package that knows MIME."""
