"""Plugin hooks of the algorithmic tasks: the zoo's recurrent networks trained on them."""
