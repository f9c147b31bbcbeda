"""What the tests and the benchmarks under ``bench/`` share.

project
    a copy of the shipped ``config/`` and ``templates/``, a clean environment
cli
    ``invite-mailer`` through click's runner or as a child process
smtp
    a real SMTP server (aiosmtpd in a thread) that records and misbehaves on request
mails
    what that server received, reduced to what the tests judge
contacts
    generated ``contacts.csv`` files
samples
    one composed mail of every kind

``tests/`` is on ``sys.path`` for pytest (``pythonpath`` in pyproject.toml);
the benchmarks put it there themselves (``bench/common.py``).
"""
