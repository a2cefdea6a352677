"""Business logic per domain. Every query is scoped to the owner; nothing here commits."""
