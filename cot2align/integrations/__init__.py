"""cot2align inside other training libraries (optional extras): `cot2align.integrations.trl` for TRL.

Each integration is one module that imports its library itself, so `import cot2align` never needs it."""
