-- tally report: each tenant's audit log now (tenant $1, NULL: every tenant):
-- leaves in the tree, the size the latest signed checkpoint covers, checkpoints
-- published, leaves reserved by batches not committed yet.
SELECT t.tenant_id,
       t.tree_size,
       (SELECT c.tree_size FROM tally.audit_checkpoints c
         WHERE c.tenant_id = t.tenant_id ORDER BY c.checkpoint_id DESC LIMIT 1),
       (SELECT count(*) FROM tally.audit_checkpoints c
         WHERE c.tenant_id = t.tenant_id AND c.published_at IS NOT NULL)::bigint,
       t.next_index - t.tree_size
FROM tally.audit_trees t
WHERE ($1::text IS NULL OR t.tenant_id = $1)
ORDER BY t.tenant_id
