"""Who is asking: company sign-in (OIDC bearer tokens), service API keys, and the principal
every request is answered for."""
