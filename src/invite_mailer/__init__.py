"""invite-mailer: German-language invitations, reminders and follow-ups for an event series."""

__version__ = "0.1.0"
