-- Alerts: each rule's state (so that restarts and leader changes neither
-- forget an alert nor send it twice), and the outbox of emails that state
-- changes write in the same transaction, which one sender thread delivers.

CREATE TABLE alert_state (
    rule             TEXT NOT NULL PRIMARY KEY,
    state            TEXT NOT NULL
        CHECK (state IN ('inactive', 'pending', 'firing', 'resolved')),
    since            BIGINT NOT NULL,
    value            DOUBLE PRECISION,
    evaluated_at     BIGINT NOT NULL,
    -- While firing: since when the condition has been clear (null: it holds).
    clear_since      BIGINT,
    -- While firing: when the last email about it was written.
    notified_at      BIGINT,
    -- +1 each time the rule starts firing.
    incident         BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE alert_outbox (
    id              BIGSERIAL PRIMARY KEY,
    created_at      BIGINT NOT NULL,
    rule            TEXT NOT NULL,
    event           TEXT NOT NULL
        CHECK (event IN ('firing', 'repeat', 'resolved', 'test')),
    subject         TEXT NOT NULL,
    body_text       TEXT NOT NULL,
    body_html       TEXT NOT NULL,
    status          TEXT NOT NULL
        CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at         BIGINT,
    -- The outbox row whose email carried this one (alerts due together go
    -- in one email); equal to id for the first.
    sent_in         BIGINT,
    last_error      TEXT
);

CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX alert_outbox_sent ON alert_outbox (sent_at) WHERE status = 'sent';
