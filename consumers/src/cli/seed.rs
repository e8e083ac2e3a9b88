//! `tally seed`: writes a generated world's reference data (tenants, teams,
//! projects, prices, budgets) to Postgres. Idempotent (upserts).

use crate::errors::{pg, StageError};
use sqlx::postgres::PgPool;
use tally_producers::world::World;

pub async fn seed(pool: &PgPool, world: &World) -> Result<(), StageError> {
    let mut tx = pool.begin().await.map_err(pg("seed begin"))?;
    for t in &world.tenants {
        sqlx::query(
            "INSERT INTO tally.tenants (tenant_id, name, requests_per_minute, tokens_per_minute) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id) DO UPDATE SET name = EXCLUDED.name, requests_per_minute = EXCLUDED.requests_per_minute, \
             tokens_per_minute = EXCLUDED.tokens_per_minute",
        )
        .bind(&t.tenant_id)
        .bind(&t.name)
        .bind(t.requests_per_minute)
        .bind(t.tokens_per_minute)
        .execute(&mut *tx)
        .await
        .map_err(pg("seed tenant"))?;
        for team in &t.teams {
            sqlx::query("INSERT INTO tally.teams (tenant_id, team_id, name) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING")
                .bind(&t.tenant_id)
                .bind(team)
                .execute(&mut *tx)
                .await
                .map_err(pg("seed team"))?;
        }
        for project in &t.projects {
            sqlx::query(
                "INSERT INTO tally.projects (tenant_id, project_id, name) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&t.tenant_id)
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(pg("seed project"))?;
        }
    }
    for p in &world.prices {
        sqlx::query(
            "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, cached_input_per_m, \
             cache_write_per_m, output_per_m, reasoning_per_m) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (provider, model, effective_from) DO NOTHING",
        )
        .bind(&p.provider)
        .bind(&p.model)
        .bind(p.effective_from)
        .bind(&p.currency)
        .bind(p.input_per_m)
        .bind(p.cached_input_per_m)
        .bind(p.cache_write_per_m)
        .bind(p.output_per_m)
        .bind(p.reasoning_per_m)
        .execute(&mut *tx)
        .await
        .map_err(pg("seed price"))?;
    }
    for b in &world.budgets {
        sqlx::query(
            "INSERT INTO tally.budgets (budget_id, scope, tenant_id, team_id, period, amount, thresholds_pct) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (budget_id) DO UPDATE SET amount = EXCLUDED.amount, \
             thresholds_pct = EXCLUDED.thresholds_pct",
        )
        .bind(&b.budget_id)
        .bind(b.scope.as_str())
        .bind(&b.tenant_id)
        .bind(&b.team_id)
        .bind(b.period.as_str())
        .bind(b.amount)
        .bind(&b.thresholds_pct)
        .execute(&mut *tx)
        .await
        .map_err(pg("seed budget"))?;
    }
    // Who may read personal data of which resource types (audit stream).
    for (tenant, actor, resource) in tally_producers::audit_grants(world) {
        sqlx::query("INSERT INTO tally.audit_grants VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(&tenant)
            .bind(&actor)
            .bind(&resource)
            .execute(&mut *tx)
            .await
            .map_err(pg("seed audit grant"))?;
    }
    tx.commit().await.map_err(pg("seed commit"))?;
    Ok(())
}
