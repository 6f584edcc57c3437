//! A Redis ACL user holding strata's rule (`strata_pipeline::streams::acl`), for the tests that
//! run strata under it.

use strata_pipeline::streams::acl;

use super::rand_suffix;

/// A Redis ACL user with a random name and password, deleted when dropped.
pub struct AclUser {
    /// Its name, random.
    pub name: String,
    /// Its password, random (the tests check it is never printed).
    pub password: String,
}

impl AclUser {
    /// Creates the user with strata's rule, then `extra` rule words (e.g. `-xack`).
    pub async fn create(extra: &[&str]) -> AclUser {
        let user = AclUser {
            name: format!("strata_test_{}", rand_suffix()),
            password: format!("pw-{}-{}", rand_suffix(), rand_suffix()),
        };
        let mut conn = admin_redis().await;
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(&user.name)
            .arg("reset")
            .arg(format!(">{}", user.password));
        cmd.arg(acl::rule()).arg(extra);
        let () = cmd.query_async(&mut conn).await.expect("ACL SETUSER");
        user
    }

    /// `redis://user:password@…` on the tests' Redis.
    pub fn url(&self) -> String {
        let base = super::redis_url();
        let rest = base.strip_prefix("redis://").unwrap_or(&base);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("redis://{}:{}@{rest}", self.name, self.password)
    }

    /// Entries of Redis's ACL log for this user: each refused command or key.
    pub async fn denials(&self) -> Vec<String> {
        let mut conn = admin_redis().await;
        let log: Vec<redis::Value> = redis::cmd("ACL")
            .arg("LOG")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        log.into_iter()
            .map(|e| format!("{e:?}"))
            .filter(|e| e.contains(&self.name))
            .collect()
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(client) = redis::Client::open(super::redis_url().as_str()) {
                if let Ok(mut conn) = client.get_connection() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("ACL").arg("DELUSER").arg(&name).query(&mut conn);
                }
            }
        })
        .join();
    }
}

pub async fn admin_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(super::redis_url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}
