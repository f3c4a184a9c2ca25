"""Switchboard's framework-free domain: registry, router, providers, engines, chat, storage."""
