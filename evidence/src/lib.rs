//! Signed, hash-chained evidence packets (in-toto Statement v1 in DSSE) and offline verification.
