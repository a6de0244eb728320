"""Attacks: the triggers (one per module, in the registry ``TRIGGERS``) and poisoning."""
