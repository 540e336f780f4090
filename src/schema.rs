// @generated automatically by Diesel CLI.

diesel::table! {
    alert_outbox (id) {
        id -> Int8,
        created_at -> Int8,
        rule -> Text,
        event -> Text,
        subject -> Text,
        body_text -> Text,
        body_html -> Text,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Int8,
        sent_at -> Nullable<Int8>,
        sent_in -> Nullable<Int8>,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    alert_state (rule) {
        rule -> Text,
        state -> Text,
        since -> Int8,
        value -> Nullable<Float8>,
        evaluated_at -> Int8,
        clear_since -> Nullable<Int8>,
        notified_at -> Nullable<Int8>,
        incident -> Int8,
    }
}

diesel::table! {
    audit_log (id) {
        id -> Int8,
        at -> Int8,
        actor -> Text,
        action -> Text,
        target -> Text,
        jobs -> Int8,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    idempotency_keys (key) {
        key -> Text,
        request_hash -> Text,
        job_ids -> Nullable<Text>,
        created_at -> Int8,
        expires_at -> Int8,
    }
}

diesel::table! {
    job_attempts (id) {
        id -> Int8,
        job_id -> Int8,
        attempt -> Int4,
        worker -> Text,
        started_at -> Int8,
        finished_at -> Int8,
        outcome -> Text,
        error -> Nullable<Text>,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    jobs (id) {
        id -> Int8,
        queue -> Text,
        kind -> Text,
        args -> Text,
        state -> Text,
        priority -> Int4,
        attempt -> Int4,
        max_attempts -> Int4,
        run_at -> Int8,
        created_at -> Int8,
        started_at -> Nullable<Int8>,
        finished_at -> Nullable<Int8>,
        timeout_ms -> Int8,
        lease_id -> Int8,
        locked_by -> Nullable<Text>,
        heartbeat_at -> Nullable<Int8>,
        deadline_at -> Nullable<Int8>,
        rescue_count -> Int4,
        last_error -> Nullable<Text>,
        unique_key -> Nullable<Text>,
        cancel_requested -> Bool,
        error_signature -> Nullable<Text>,
    }
}

diesel::table! {
    leader (name) {
        name -> Text,
        holder -> Text,
        term -> Int8,
        expires_at -> Int8,
    }
}

diesel::table! {
    queues (name) {
        name -> Text,
        paused -> Bool,
        updated_at -> Int8,
    }
}

diesel::table! {
    workers (id) {
        id -> Text,
        host -> Text,
        pid -> Int4,
        queues -> Text,
        concurrency -> Int4,
        version -> Text,
        started_at -> Int8,
        heartbeat_at -> Int8,
    }
}

diesel::joinable!(job_attempts -> jobs (job_id));

diesel::allow_tables_to_appear_in_same_query!(
    alert_outbox,
    alert_state,
    audit_log,
    idempotency_keys,
    job_attempts,
    jobs,
    leader,
    queues,
    workers,
);
