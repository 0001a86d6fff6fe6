"""The default orientation provider, registered through the platform's hooks."""
