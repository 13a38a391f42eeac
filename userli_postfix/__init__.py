"""userli-postfix: Postfix lookups, sending quotas and SMTP logins from Userli."""

__version__ = "0.1.0"
