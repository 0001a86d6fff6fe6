"""Security: who is calling (principals, API tokens, OIDC), what they may do
(roles and scopes), and the append-only audit trail of what they did."""
