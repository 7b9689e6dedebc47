"""Scale-out: a study cut into independent shards that run on workers and merge into one Result.

``shardable`` wraps a method from the outside with an ``executor`` argument (the methods themselves
know nothing of executors); ``sharding`` plans and merges shards; ``executors`` runs them in-process
and ``ray_executor`` on Ray actors; ``shard_store`` keeps finished shards so a failed run resumes;
``model_source`` says how a worker gets its model; ``identity`` describes a study canonically, for the
key its saved shards are found by. It imports the methods, the zoo and below.
"""
