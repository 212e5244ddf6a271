//! Reply shapes shared by the commands.

use redis_module::redisvalue::RedisValueKey;
use redis_module::RedisValue;

/// A map reply: a RESP3 map, or a flat field/value array on RESP2.
pub fn map<const N: usize>(fields: [(&str, RedisValue); N]) -> RedisValue {
    RedisValue::OrderedMap(
        fields
            .into_iter()
            .map(|(k, v)| (RedisValueKey::String(k.to_string()), v))
            .collect(),
    )
}
