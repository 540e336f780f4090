//! The web server (actix-web): for now `/healthz`; the JSON API and the
//! dashboard are added here.

use std::net::TcpListener;

use actix_web::{App, HttpResponse, HttpServer, get, web};

use crate::shutdown::{Shutdown, Stage};
use crate::store::Store;

#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Serves on `listener` until `shutdown` leaves [`Stage::Running`], then
/// finishes the requests in progress and returns.
pub async fn serve(store: Store, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let data = web::Data::new(store);
    let server = HttpServer::new(move || App::new().app_data(data.clone()).service(healthz))
        // errand handles SIGTERM/SIGINT itself (drain workers first).
        .disable_signals()
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
    let handle = server.handle();
    std::thread::Builder::new()
        .name("errand-web-stop".into())
        .spawn(move || {
            shutdown.wait_for(Stage::Draining, None);
            // `stop` sends its command at once; the returned future only
            // waits for completion, which `server.await` below does.
            drop(handle.stop(true));
        })?;
    server.await
}
